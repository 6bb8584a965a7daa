"""Training data for the CAA blocks: released data sets (ScanNet, Matterport3D skyboxes) and procedural ones.

Every data set yields :class:`backend.train.samples.MultiViewSample`; none of them imports torch.
"""
