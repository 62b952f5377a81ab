"""The development harness: real local servers, a local stand-in for pods, the demo, CRD generation.

Not part of the product: not in the wheel, not in the image; nothing in ``kubetriage`` imports it.
"""
