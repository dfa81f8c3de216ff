"""`peftbooth ui`: a local web app over the library (see docs/ui.md).

A thin face: it writes a run's ``config.yaml``, starts ``peftbooth train --config RUN/config.yaml`` as its own
process, and reads progress, loss, validation images and reports back from the run folder. Standard library
server, one static page, nothing loaded from the web; 127.0.0.1 unless told otherwise, and then a token.
"""

from __future__ import annotations

from pathlib import Path


def add_command(subparsers) -> None:
    """Add the `ui` subcommand to the main CLI's subparsers."""
    p = subparsers.add_parser("ui", help="serve the local web app: new runs, progress, try it, export")
    p.add_argument("--runs-dir", default="runs", help="folder of run folders (default: ./runs)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; anything but 127.0.0.1/localhost needs PEFTBOOTH_UI_TOKEN set")
    p.add_argument("--port", type=int, default=7860, help="port (0: a free one)")
    p.add_argument("--allow-dir", action="append", default=[], metavar="DIR",
                   help="a folder of photos the page may read besides the runs folder (repeatable)")
    p.set_defaults(func=cmd_ui)


def cmd_ui(args) -> int:
    from .server import make_server

    server = make_server(Path(args.runs_dir), args.host, args.port, [Path(d) for d in args.allow_dir])
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
