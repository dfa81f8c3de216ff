"""`peftbooth ui`: a local web app over the library (see docs/ui.md).

A thin face: it writes a run's ``config.yaml``, starts ``peftbooth train --config RUN/config.yaml`` as its own
process, and reads progress, loss, validation images and reports back from the run folder. Standard library
server, one static page, nothing loaded from the web; 127.0.0.1 unless told otherwise, and then a token.
"""

from __future__ import annotations

from pathlib import Path

from ..config.flags import add_option_flags, options_from_args
from ..config.options import UiOptions


def add_command(subparsers) -> None:
    """Add the `ui` subcommand to the main CLI's subparsers."""
    p = subparsers.add_parser("ui", help="serve the local web app: new runs, progress, try it, export")
    add_option_flags(p, UiOptions)
    p.set_defaults(func=cmd_ui)


def cmd_ui(args) -> int:
    from .server import make_server

    o = options_from_args(UiOptions, args)
    server = make_server(Path(o.runs_dir), o.host, o.port, [Path(d) for d in o.allow_dir])
    host, port = server.server_address[:2]
    app = server.RequestHandlerClass.app
    app.queue.start()
    suffix = "?token=$PEFTBOOTH_UI_TOKEN" if app.token else ""
    print(f"peftbooth ui: {app.runs_dir} at http://{host}:{port}/{suffix}", flush=True)
    try:
        server.serve_forever(poll_interval=0.25)
    except KeyboardInterrupt:
        print("\npeftbooth ui: stopped (training processes go on; start the UI again to see them)", flush=True)
    finally:
        app.queue.close()
        server.server_close()
    return 0
