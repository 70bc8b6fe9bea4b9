"""The web page and the HTTP/JSON API, served next to gRPC by the same process.

``start_http`` builds the app around the gRPC servicer instance and runs it
with uvicorn in a thread; ``api`` builds the app, ``routers`` hold the routes and
``bridge`` says how a request reaches the servicer.
"""
