"""Training: ``setup`` (inputs checked, components loaded, class images, adapters, caches,
optimizer) -> ``loop.fit`` -> ``saving``; the step's maths (``objective``, ``losses``) and the components beside
the loop (checkpoint, signals, EMA, tracking, validation, memory check, processes)."""
