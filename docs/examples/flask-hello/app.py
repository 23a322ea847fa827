"""The seeds' Flask hello: a page, and /kill to watch Paddock bring it back."""
import os

from flask import Flask

app = Flask(__name__)


@app.route("/")
def hello():
    return "Hello from Paddock!\n"


@app.route("/kill")
def kill():
    # Ends this process at once; the runner starts it again.
    os._exit(1)
