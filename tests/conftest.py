"""Shared fixtures: an isolated data directory and the tiny random model."""

from __future__ import annotations

import os
import tempfile
import warnings

# Models and runs of a test session live in a throwaway directory, never in the user's cache.
os.environ["PREFIX_RFT_DATA_DIR"] = tempfile.mkdtemp(prefix="prefix-rft-tests-")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*generation flags.*")
