"""What the two HTTP servers, the API and the model server, share; no torch, nothing of ours.

errors.py       the OpenAI-style error body and the handlers that answer every failure with it
completions.py  the OpenAI-compatible completions schema: the API validates, the model server runs
disconnects.py  giving up on work whose caller has gone away
"""
