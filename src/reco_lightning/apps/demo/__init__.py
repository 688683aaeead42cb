"""The real-data demo (an app on top of the library): Fashion-MNIST splits and pair files, a stand-in CLIP
that lacks some classes, and the pipeline behind `reco demo`. Nothing in the library imports it."""
