"""Crowd pose tracking on the pose family (issue 38): built-in crowd videos (`crowds`), a person detector,
a SORT-style tracker, optical-flow propagation of joints, and PoseTrack's tracking metrics."""
