"""Web framework integrations: :mod:`tokendb.contrib.fastapi`, :mod:`tokendb.contrib.starlette`.

They need the ``fastapi`` extra (``pip install 'tokendb[fastapi]'``).
"""
