"""A channel-name prefix of this test session's own, so that test sessions running
side by side on one host never see each other's channels."""

import os

PREFIX = f"test{os.getpid()}"
