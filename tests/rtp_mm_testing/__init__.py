"""rtp-mm's test kit: oracles, tiny checkpoints and server helpers shared by the test folders.

Imported as ``rtp_mm_testing`` (``tests/`` is on pytest's ``pythonpath``). The name is the product's own with a
suffix so that no installed package can shadow it or be shadowed by it (see test_api/test_layout.py).
"""
