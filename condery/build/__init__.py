"""From a request to stored manifests. service.py answers the registry's questions
(records, refresh, queue, coordination, prebuild, look); pipeline.py is the build read
top to bottom (solve, layers, manifests); around them: the one state object (state),
each platform's base (bases), one image's layers (image_layers), pure assembly steps
(assembly), look without building (look), what became of builds (outcomes), the build
queue (admission), cross-replica locks (coordination), build progress (progress)."""
