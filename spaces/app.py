"""The Hugging Face Space: the Harmon demo of `harmon_hf.demo`.

    python spaces/app.py [--model FOLDER_OR_HUB_ID] [--port 7860]

The model is --model, else $HARMON_MODEL, else the model bundled with harmon-hf.
"""

import argparse
import os

from harmon_hf.demo import launch


def main():
    parser = argparse.ArgumentParser(description="Serve the Harmon demo.")
    parser.add_argument("--model", help="model folder or Hub id (default: $HARMON_MODEL, else the bundled model)")
    # Spaces set GRADIO_SERVER_NAME=0.0.0.0 to reach the app from outside its container; elsewhere it stays local.
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="address to listen on (default: $GRADIO_SERVER_NAME, else 127.0.0.1)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)),
                        help="port (default: $GRADIO_SERVER_PORT, else 7860)")
    args = parser.parse_args()
    launch(model=args.model, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
