"""Semantic segmentation: data, the built-in scenes, metrics, source training, pixel SHOT, evaluation.

    data.py      image + label-map data (folders, list files), joint transforms
    scenes.py    the built-in `builtin:scenes/<domain>` benchmark
    metrics.py   confusion matrix, IoU, mIoU, pixel accuracy
    source.py    source training (`train-source --task segmentation`)
    shot.py      source-free adaptation (SHOT-IM / SHOT per pixel)
    evaluate.py  mIoU of a checkpoint on a data set
"""
