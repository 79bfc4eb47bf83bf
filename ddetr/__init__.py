"""ddetr: Deformable DETR from dense attention to a trained detector."""
__version__ = "0.1.0"
