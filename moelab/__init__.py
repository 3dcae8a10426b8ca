"""moelab: sequence-level mixture-of-experts language models trained by online EM."""

__version__ = "0.1.0"
