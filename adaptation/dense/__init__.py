"""The dense-prediction family: segmentation (and later keypoint) heads on the shared backbones, their
data, metrics, source training and source-free adaptation.

    heads.py    head registry (fcn, issa, ordnet, hrnet, ocr): feature part + frozen 1x1 classifier
    model.py    SegmentationModel = registry backbone + registry head, logits at input resolution
    data.py     image + label-map data (folders, list files), joint transforms
    scenes.py   the built-in `builtin:scenes/<domain>` benchmark
    metrics.py  confusion matrix, IoU, mIoU, pixel accuracy
"""
