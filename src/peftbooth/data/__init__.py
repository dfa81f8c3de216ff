"""The instance and class photos: listing and loading images, masks and captions (``images``), crops,
flips and micro-conditioning (``transforms``), the dataset, its epoch order and batches (``dataset``)."""
