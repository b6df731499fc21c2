"""Packaged LightningCLI configurations (``mambaclinix.demo.config_path()``)."""
