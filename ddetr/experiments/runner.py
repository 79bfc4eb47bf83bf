"""Running many independent jobs, one after the other or in a pool of processes.

The convergence experiment trains one model per job. On a 2-core CPU two one-thread
runs side by side give more throughput than one two-thread run, and every run sees the
same kind of core; so jobs go to processes started with "spawn" (a fresh interpreter
each: no torch thread pool or CUDA state is inherited from the parent).
"""
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed


def run_jobs(function, jobs_args, processes, on_result, on_error):
    """Call ``function(*args)`` for each args of jobs_args.

    Args:
        function: a module-level function (processes > 1 pickles it by name).
        jobs_args: list of argument tuples, in the order to start them.
        processes: <= 1 runs the jobs here, one after the other (an exception stops
            them); more runs that many at a time in spawned processes.
        on_result: called with each job's return value as it finishes (in this
            process, in the order they finish).
        on_error: called with (args, exception) for a job that raised in a worker
            process; the other jobs keep going.
    """
    if processes <= 1:
        for args in jobs_args:
            on_result(function(*args))
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(processes, mp_context=context) as pool:
        futures = {pool.submit(function, *args): args for args in jobs_args}
        for future in as_completed(futures):
            try:
                result = future.result()
            except Exception as err:     # record it, keep the other jobs going
                on_error(futures[future], err)
                continue
            on_result(result)
