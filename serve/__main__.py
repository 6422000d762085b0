"""python -m serve [--host 127.0.0.1] [--port 8080] [--models-dir serve/models]"""

import argparse
import logging

import uvicorn

from serve.app import create_app


def main():
    parser = argparse.ArgumentParser(prog="python -m serve", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--models-dir", default="serve/models", help="folder of exported model folders")
    parser.add_argument("--max-batch", type=int, default=16, help="requests decoded together per model")
    parser.add_argument("--precision", choices=("int8", "fp32"), default="int8",
                        help="int8: int8 linear weights, several times faster on CPU (default); "
                             "fp32: exactly the exported weights")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    app = create_app(args.models_dir, max_batch=args.max_batch, precision=args.precision)
    uvicorn.run(app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
