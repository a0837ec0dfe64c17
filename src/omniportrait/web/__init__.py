"""The web app (``omniportrait web``, ``pip install 'omniportrait[web]'``): :mod:`.app` builds the Gradio page,
:mod:`.generation` runs the CLI's generation for it. Importing this package does not import Gradio."""
