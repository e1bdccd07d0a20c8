"""What segmentation and pose share: the models built from a registry backbone and a registry head
(workbench.heads: fcn, issa, ordnet, hrnet, ocr; deconv, heatmap).

    model.py    SegmentationModel and PoseModel = registry backbone + registry head; loading a dense
                checkpoint of either task (load_dense_model)
"""
