"""The engine trusts the CA bundle it carries, not one the host points it to.

A fake log service serves HTTPS with a certificate from a throwaway CA, and
the engine is told about that CA the way a host's trust store would
(SSL_CERT_FILE, which OpenSSL reads even under ``python -E``). The engine
must refuse the service anyway: only certifi's bundle, shipped with the
engine, decides whom it talks to.
"""

import os
import shutil
import ssl
import subprocess
import tempfile
import unittest

from tests.engine_proc import EngineProcess
from tests.fakelog import FakeLogService
from tests.test_api import request

KEY = "acct/stage-ca/le"


def make_certificate(folder):
    """Write a self-signed certificate for 127.0.0.1; returns (cert, key) paths."""
    cert, key = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=liteengine-test-host-ca",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            key,
            "-out",
            cert,
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@unittest.skipUnless(shutil.which("openssl"), "needs the openssl command")
class BundledCaTest(unittest.TestCase):
    """A CA trusted only by the host does not let the engine connect."""

    def test_host_trust_store_is_ignored(self):
        folder = tempfile.mkdtemp(prefix="liteengine-test-ca-")
        self.addCleanup(shutil.rmtree, folder)
        cert, key = make_certificate(folder)
        server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_context.load_cert_chain(cert, key)
        service = FakeLogService(ssl_context=server_context).start()
        self.addCleanup(service.stop)

        engine = EngineProcess(
            {
                "SSL_CERT_FILE": cert,
                "SSL_CERT_DIR": folder,
                "LE_OPEN_TIMEOUT": "0.5",
                "LE_WRITE_TIMEOUT": "0.5",
                "LE_UPLOAD_TIMEOUT": "0.5",
                "LE_CLOSE_TIMEOUT": "0.5",
            }
        ).start()
        self.addCleanup(engine.cleanup)
        body = {
            "le_log_key": KEY,
            "log_config": {"url": service.url, "account_id": "acct", "token": "tok"},
        }
        self.assertEqual(request(engine.url, "POST", "/setup", body)[0], 200)
        self.assertEqual(request(engine.url, "POST", "/destroy", {})[0], 200)

        refusal = engine.wait_for_stderr('msg="log stream not opened"')
        self.assertIsNotNone(refusal, "".join(engine.stderr_lines()))
        self.assertIn("CERTIFICATE_VERIFY_FAILED", refusal)
        self.assertEqual(service.opened(KEY), 0)
        self.assertEqual(service.uploads(KEY), [])


if __name__ == "__main__":
    unittest.main()
