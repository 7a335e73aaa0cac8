"""Fusion rules over N aligned inputs."""
