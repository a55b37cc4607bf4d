"""Test stand-in for OpenAI's dall_e package (see ../README.md)."""

from dall_e.decoder import Decoder
from dall_e.encoder import Encoder
from dall_e.utils import map_pixels, unmap_pixels

__all__ = ["Encoder", "Decoder", "map_pixels", "unmap_pixels"]
