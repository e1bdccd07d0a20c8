"""Top-down pose (heatmaps): data, the built-in figures, keypoint geometry and metrics, source training,
the mean teacher, evaluation.

    data.py          COCO keypoint data, crops, flips, heatmap targets
    figures.py       the built-in `builtin:figures/<domain>` benchmark
    keypoints.py     affine crops, heatmaps and their decoding, PCK, OKS AP
    source.py        source training (`train-source --task pose`)
    mean_teacher.py  source-free adaptation (`adapt --task pose`)
    evaluate.py      PCK and AP of a checkpoint on a data set
"""
