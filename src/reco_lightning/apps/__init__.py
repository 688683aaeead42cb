"""Apps on top of the library: the real-data demo (`reco demo`), the tiny setup (`reco prepare-tiny`) and
the `reco` console script that adds their commands to the library's. Nothing in the library imports them."""
