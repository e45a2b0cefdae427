"""Stenograph: a self-hosted speech-to-text server that speaks Cartesia's STT API."""

__version__ = "0.1.0"
