"""What segmentation and pose share: dense heads on the shared backbones and the models built from them.

    heads.py    head registry (fcn, issa, ordnet, hrnet, ocr; deconv, heatmap): feature part + classifier
    model.py    SegmentationModel and PoseModel = registry backbone + registry head; loading a dense
                checkpoint of either task (load_dense_model)
"""
