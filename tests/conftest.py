import os
import tempfile

# Nothing in the test suite may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Nor read or write the user's models folder: an empty one of its own.
os.environ["MVDIFF_MODELS_DIR"] = tempfile.mkdtemp(prefix="mvdiff-test-models-")
