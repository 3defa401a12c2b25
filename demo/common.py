"""What every module of the UI shares: the event settings of cheap UI updates and the page's CSS."""
from __future__ import annotations

UI_EVENT = dict(queue=False, api_visibility="private", show_progress="hidden")  # cheap, model-free UI updates

CSS = """
/* Images of the built-in model are 64x64: show them big, with crisp pixels; the files keep their size. */
.lds-pixelated img, .lds-pixelated canvas { image-rendering: pixelated; image-rendering: crisp-edges; }
.lds-pixelated .image-frame img, .lds-pixelated .image-container img { min-width: 192px; min-height: 192px;
  width: 100%; height: 100%; object-fit: contain; }
.lds-gallery .thumbnail-item img, .lds-gallery .thumbnail-lg img, .lds-gallery img { image-rendering: pixelated; }
.lds-warning { color: #b45309; }
.lds-warning p { margin: 0; }
#lds-header h1 { margin-bottom: 0.2em; }
"""
