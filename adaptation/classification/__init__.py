"""Image classification: a source model (backbone + SHOT's bottleneck and weight-normalised classifier)
trained on labelled data and adapted to unlabelled target data.

    data.py        list files, one-folder-per-class trees and the built-in digits as datasets
    model.py       ShotModel: backbone F, bottleneck B, classifier C
    source.py      source training (`train-source`), selection on a val split, robust objectives
    shot.py        SHOT-IM, SHOT and SHOT++ (`adapt`)
    rotation.py    SHOT++'s rotation self-supervision
    mixmatch.py    SHOT++'s labeling transfer
    evaluate.py    accuracy, and accuracy under PGD, of a checkpoint (`evaluate`)
    quickstart.py  `workbench quickstart`: a digits source adapted with SHOT, end to end
"""
