"""The thin Flask layer: one blueprint per URL area (or CLI group), each exposing ``bp``."""
