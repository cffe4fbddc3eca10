"""The engine trusts the CA bundle it carries, not one the host points it to.

A fake log service serves HTTPS with a certificate from a throwaway CA, and
the engine is told about that CA the way a host's trust store would
(SSL_CERT_FILE, which OpenSSL reads even under ``python -E``). The engine
must refuse the service anyway: only certifi's bundle, shipped with the
engine, decides whom it talks to.
"""

import shutil
import ssl
import tempfile
import unittest

from tests.engine_proc import EngineProcess, short_deadlines
from tests.fakelog import FakeLogService, self_signed_certificate
from tests.test_api import request

KEY = "acct/stage-ca/le"


@unittest.skipUnless(shutil.which("openssl"), "needs the openssl command")
class BundledCaTest(unittest.TestCase):
    """A CA trusted only by the host does not let the engine connect."""

    def test_host_trust_store_is_ignored(self):
        folder = tempfile.mkdtemp(prefix="liteengine-test-ca-")
        self.addCleanup(shutil.rmtree, folder)
        cert, key = self_signed_certificate(folder, "liteengine-test-host-ca")
        server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_context.load_cert_chain(cert, key)
        service = FakeLogService(ssl_context=server_context).start()
        self.addCleanup(service.stop)

        engine = EngineProcess(
            {
                "SSL_CERT_FILE": cert,
                "SSL_CERT_DIR": folder,
                **short_deadlines(0.5),
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
