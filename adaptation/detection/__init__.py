"""Person detection for crowd pose tracking (issue 38): a torchvision Faster R-CNN on a registry backbone with
a feature pyramid, trained from scratch on the built-in crowds and scored by COCO box AP."""
