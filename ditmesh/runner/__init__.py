from ditmesh.runner.xfuser import XFuserWorker  # noqa: F401  (xfuser itself loads in XFuserWorker.setup)
