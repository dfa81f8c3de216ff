"""A run on disk: the run folder's layout (``rundir``), the one atomic writer (``atomic``), its
report and chart, the model card and Hub upload (``hub``), and the adapter file formats (``formats``)."""
