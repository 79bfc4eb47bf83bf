"""A file the user names (a config, a checkpoint, an image): one place that says, in
one line, that the path is a folder or missing, and what was expected instead."""
from pathlib import Path


def existing_file(path, what, expected, folder_error=IsADirectoryError):
    """path as a Path if it names an existing file. Else raise folder_error (for a
    folder: "<what> <path> is a directory; expected <expected>") or FileNotFoundError
    ("<what> <path> does not exist")."""
    path = Path(path)
    if path.is_dir():
        raise folder_error(f"{what} {path} is a directory; expected {expected}")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    return path
