"""gunicorn settings: the Starlette example on 2 uvicorn workers, each on its own uringloop.

    gunicorn -c examples/gunicorn.conf.py

gunicorn binds the socket once and forks the workers; each worker builds its ring after
the fork and accepts from the shared socket. Scale with ``-w N`` (one per core); override
the address with ``-b HOST:PORT``.
"""

import os

chdir = os.path.dirname(os.path.abspath(__file__))
wsgi_app = "starlette_app:app"
worker_class = "uringloop.workers.UvicornWorker"
workers = 2
bind = "127.0.0.1:8000"
