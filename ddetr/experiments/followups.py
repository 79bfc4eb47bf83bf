"""What came after Deformable DETR: the follow-up detectors side by side, as data.

One record per paper: what it changes (the object query, the attention, the matching,
the training), why it converges faster in its authors' words (a short quotation, with
where it stands), the COCO val2017 results it reports with a ResNet-50 backbone (epochs,
AP, and the table and row the number is printed in), and the ``ddetr.config`` switch
that runs the idea here, where there is one. Chapter 7 shows ``followups_html()``; ``followups_markdown()`` is the same table as text.

Where a paper's own table was not at hand, the number is taken from a table of a later
paper that reprints it, named as such (SMCA's 50-epoch row, Anchor DETR's rows), or
from the authors' release notes of the paper's results (SAM-DETR). Settings differ from
row to row (single-scale C5, dilated C5 "DC5", multi-scale; 300 or 900 queries), so the
setting is part of every result.
"""
import html
import re

DEFORMABLE_DETR = {
    "name": "Deformable DETR", "cite": "Zhu et al., ICLR 2021",
    "changes": "attention: each query samples K points per head and level around a "
               "reference point (multi-scale); boxes predicted relative to it",
    "why": ("\"the deformable attention module only attends to a small set of key sampling "
            "points around a reference point, regardless of the spatial size of the feature "
            "maps\"", "Section 4.1"),
    "results": [
        {"setting": "multi-scale", "epochs": 50, "AP": 43.8,
         "source": "Table 1, row Deformable DETR"},
        {"setting": "multi-scale, refinement + two-stage", "epochs": 50, "AP": 46.2,
         "source": "Table 1, row ++ two-stage Deformable DETR"},
    ],
    "switch": "presets `paper`, `paper_box_refine` (`with_box_refine=True`), "
              "`paper_two_stage` (`two_stage=True`)",
}

FOLLOWUPS = [
    {"name": "SMCA", "cite": "Gao et al., ICCV 2021",
     "changes": "attention: dense co-attention multiplied by a Gaussian-like map around a "
                "centre and scale each query predicts (per head); multi-scale encoder",
     "why": ("\"constraining co-attention responses to be high near initially estimated "
             "bounding box locations\"", "abstract"),
     "results": [
         {"setting": "multi-scale", "epochs": 50, "AP": 43.7,
          "source": "reprinted in DAB-DETR (Liu et al., ICLR 2022) Table 2, row SMCA-R50"},
         {"setting": "multi-scale", "epochs": 108, "AP": 45.6, "source": "abstract"},
     ],
     "switch": None},
    {"name": "Conditional DETR", "cite": "Meng et al., ICCV 2021",
     "changes": "query: a conditional spatial query, the reference point's sine code scaled "
                "by a vector predicted from the decoder embedding; attention: content and "
                "spatial dot products concatenated, not added",
     "why": ("each head attends to a band holding one extremity or a region of the box; "
             "this \"narrows down the spatial range for localizing the distinct regions\", "
             "\"relaxing the dependence on the content embeddings and easing the "
             "training\"", "abstract"),
     "results": [
         {"setting": "single-scale C5", "epochs": 50, "AP": 40.9,
          "source": "Table 1, row Conditional DETR-R50"},
         {"setting": "single-scale DC5", "epochs": 50, "AP": 43.8,
          "source": "Table 1, row Conditional DETR-DC5-R50"},
         {"setting": "single-scale C5", "epochs": 108, "AP": 43.0,
          "source": "Table 1, row Conditional DETR-R50"},
     ],
     "switch": None},
    {"name": "Anchor DETR", "cite": "Wang et al., AAAI 2022",
     "changes": "query: 2-D anchor points, encoded like the keys' positions, with several "
                "patterns per point; attention: row-column decoupled (RCDA) to save memory",
     "why": ("\"each object query focuses on the objects near the anchor point\"",
             "abstract"),
     "results": [
         {"setting": "single-scale C5, 3 patterns", "epochs": 50, "AP": 42.1,
          "source": "reprinted in DAB-DETR Table 2, row Anchor DETR-R50*"},
         {"setting": "single-scale DC5, 3 patterns", "epochs": 50, "AP": 44.2,
          "source": "abstract; DAB-DETR Table 2, row Anchor DETR-DC5-R50*"},
     ],
     "switch": None},
    {"name": "DAB-DETR", "cite": "Liu et al., ICLR 2022",
     "changes": "query: a learned 4-D anchor box per query, its positional query an MLP of "
                "the box's sine code, updated layer by layer; attention: positional part "
                "modulated by the box's width and height",
     "why": ("\"explicit positional priors to improve the query-to-feature similarity\"; "
             "DETR's learned queries have \"multiple modes and nearly uniform attention "
             "weights\"", "abstract; Section 3"),
     "results": [
         {"setting": "single-scale C5", "epochs": 50, "AP": 42.2,
          "source": "Table 2, row DAB-DETR-R50"},
         {"setting": "single-scale DC5, 3 patterns", "epochs": 50, "AP": 45.7,
          "source": "Table 2, row DAB-DETR-DC5-R50*"},
         {"setting": "multi-scale (DAB-Deformable-DETR)", "epochs": 50, "AP": 46.8,
          "source": "Table 5, row 4 (50 epochs: Appendix A)"},
     ],
     "switch": '`query_anchors="dab"` with `with_box_refine=True` (anchor boxes as '
               'queries; without the width/height modulation and the conditional scaling)'},
    {"name": "SAM-DETR", "cite": "Zhang et al., CVPR 2022",
     "changes": "query: re-sampled from the encoded features inside a learnable reference "
                "box (RoIAlign) and at salient points it predicts, before cross-attention",
     "why": ("slow convergence comes from \"the complication in matching object queries to "
             "encoded image features\"; queries are projected \"into the same embedding "
             "space as encoded image features\"", "authors' release notes"),
     "results": [
         {"setting": "single-scale C5", "epochs": 12, "AP": 33.1,
          "source": "authors' release notes of the CVPR paper's results, SAM-DETR-R50"},
         {"setting": "single-scale C5", "epochs": 50, "AP": 39.8,
          "source": "authors' release notes of the CVPR paper's results, SAM-DETR-R50"},
         {"setting": "single-scale C5, with SMCA", "epochs": 50, "AP": 41.8,
          "source": "authors' release notes of the CVPR paper's results, SAM-DETR-R50 "
                    "w/ SMCA"},
     ],
     "switch": None},
    {"name": "DN-DETR", "cite": "Li et al., CVPR 2022",
     "changes": "training: noised ground-truth boxes and labels fed as extra queries that "
                "must be reconstructed, with no matching (an attention mask hides them from "
                "the matched queries); queries are DAB-DETR's anchor boxes",
     "why": ("\"the slow convergence results from the instability of bipartite graph "
             "matching which causes inconsistent optimization goals in early training "
             "stages\"", "abstract"),
     "results": [
         {"setting": "single-scale C5", "epochs": 50, "AP": 44.1,
          "source": "Table 1, row DN-DETR-R50"},
         {"setting": "multi-scale (DN-Deformable-DETR)", "epochs": 12, "AP": 43.4,
          "source": "Table 2, row DN-Deformable-DETR-R50"},
         {"setting": "multi-scale (DN-Deformable-DETR)", "epochs": 50, "AP": 48.6,
          "source": "Table 3, row DN-Deformable-DETR-R50"},
     ],
     "switch": "`dn_detr=True` on two-stage (`with_box_refine=True`, `two_stage=True`; "
               "the cpu preset uses it): denoising groups, training only"},
    {"name": "DINO", "cite": "Zhang et al., ICLR 2023",
     "changes": "training: contrastive denoising (positive and negative noised boxes); "
                "query: mixed query selection (positions from the encoder's top proposals, "
                "contents learned); refinement: look forward twice (gradients from the next "
                "layer reach the box of this one)",
     "why": ("\"by improving the denoising training, query initialization, and box "
             "prediction\"", "Section 1"),
     "results": [
         {"setting": "multi-scale (4 levels), 900 queries", "epochs": 12, "AP": 49.0,
          "source": "Table 1, row DINO-4scale"},
         {"setting": "multi-scale (4 levels), 900 queries", "epochs": 36, "AP": 50.9,
          "source": "Table 2, row DINO-4scale (36 epochs)"},
     ],
     "switch": "`dino_look_forward_twice=True` with `with_box_refine=True` (look forward "
               "twice only, training only)"},
    {"name": "H-DETR", "cite": "Jia et al., CVPR 2023",
     "changes": "matching: an extra group of queries trained one-to-many (each object "
                "repeated K times) next to the one-to-one group; only the one-to-one group "
                "is used at inference, so no NMS",
     "why": ("\"the one-to-one set matching significantly reduces the training efficacy of "
             "positive samples\"", "abstract"),
     "results": [
         {"setting": "multi-scale (H-Deformable-DETR)", "epochs": 12, "AP": 48.7,
          "source": "Table 1, row H-Deformable-DETR R50, 1x schedule"},
         {"setting": "multi-scale (H-Deformable-DETR)", "epochs": 36, "AP": 50.0,
          "source": "Table 1, row H-Deformable-DETR R50, 3x schedule"},
     ],
     "switch": "`h_detr=True` on two-stage (`with_box_refine=True`, `two_stage=True`): "
               "the one-to-many queries are more of the encoder's top proposals"},
    {"name": "RT-DETR", "cite": "Lv et al., arXiv 2304.08069; CVPR 2024",
     "changes": "encoder: a hybrid of attention within the smallest map and convolutional "
                "fusion across scales; training: IoU-aware query selection (the class "
                "scores of proposals and queries learn their box's IoU, with VarifocalNet's "
                "loss), so the top-scoring proposals are the well-placed ones",
     "why": ("\"IoU-aware query selection to further improve performance by providing "
             "higher quality initial object queries to the decoder\"", "abstract (v2)"),
     "results": [
         {"setting": "multi-scale (hybrid encoder), 300 queries", "epochs": 72, "AP": 53.1,
          "source": "abstract, RT-DETR-R50 (its 72 epochs from the authors' release notes)"},
     ],
     "switch": "`rt_detr_vfl=True` (the IoU-aware classification loss only, training "
               "only; Deformable DETR's encoder stays)"},
]


HEADER = ("method", "what it changes", "why it converges faster (authors' words)",
          "reported on COCO val2017, ResNet-50", "ddetr switch")


def _cells(record):
    """The table's five cells of one record (Markdown: **bold**, `code`, <br>)."""
    quote, where = record["why"]
    results = "<br>".join(f"{r['epochs']} ep: {r['AP']:.1f} AP ({r['setting']}; "
                          f"{r['source']})" for r in record["results"])
    return [f"**{record['name']}** ({record['cite']})", record["changes"],
            f"{quote} ({where})", results, record["switch"] or "none"]


def followups_markdown(records=None):
    """The comparison table as Markdown (one row per paper, Deformable DETR first):
    what changes, why it converges faster (quoted, with where), reported COCO val2017
    results with a ResNet-50 (epochs, AP, setting, table and row), ddetr switch."""
    records = [DEFORMABLE_DETR, *FOLLOWUPS] if records is None else records
    lines = ["| " + " | ".join(HEADER) + " |", "|" + " --- |" * len(HEADER)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in records]
    return "\n".join(lines)


def followups_html(records=None):
    """The same table as an HTML table (the book renders it; `code` becomes <code>)."""
    records = [DEFORMABLE_DETR, *FOLLOWUPS] if records is None else records
    cell = 'style="vertical-align: top; text-align: left; padding: 4px 6px; ' \
           'border-top: 1px solid #bbb"'
    head = "".join(f"<th {cell}>{html.escape(h)}</th>" for h in HEADER)
    rows = "".join("<tr>" + "".join(f"<td {cell}>{_html(c)}</td>" for c in _cells(r))
                   + "</tr>" for r in records)
    return (f'<table class="followups" style="font-size: 0.82em; border-collapse: collapse; '
            f'width: 100%"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>')


def _html(cell):
    text = html.escape(cell, quote=False).replace("&lt;br&gt;", "<br>")
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)
