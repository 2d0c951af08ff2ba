#!/usr/bin/env python3
"""TLS: spindle-nbd with X.509 (--tls-creds) and PSK (--tls-psk) credentials made by certtool and
psktool (gnutls-bin), driven by libnbd (nbdinfo, python3-libnbd) and QEMU (qemu-img, qemu-io),
plus raw-socket checks of the STARTTLS rules with Python's ssl module: forced TLS answers
nothing in clear text, STARTTLS forgets what was negotiated before it, wrong credentials are
refused and the server keeps serving. See shared/reference/nbd.md §1.14."""

import os
import socket
import ssl
import struct
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import spindle_interop as si  # noqa: E402
from spindle_interop import (MiB, OPT_EXPORT_NAME, OPT_GO, OPT_LIST, OPT_STRUCTURED_REPLY,  # noqa
                             REP_ACK, REP_ERR_INVALID, REP_ERR_UNSUP, CMD_READ, CMD_DISC,
                             CLIENT_FLAG_FIXED_NEWSTYLE, CLIENT_FLAG_NO_ZEROES, read_greeting,
                             send_option, read_option_reply, info_payload, request,
                             read_simple_reply, wait_closed, pattern)

OPT_STARTTLS = 5
REP_ERR_TLS_REQD = (1 << 31) | 5


def certtool(*args):
    si.run(["certtool", *args], timeout=60)


def make_x509(directory, cn_suffix=""):
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate, in the
    layout QEMU and nbdkit use (ca-cert.pem, server-*.pem, client-*.pem)."""
    os.makedirs(directory, exist_ok=True)
    p = lambda name: os.path.join(directory, name)  # noqa: E731
    templates = {
        "ca.info": f"cn = Spindle test CA{cn_suffix}\nca\ncert_signing_key\nexpiration_days = 30\n",
        "server.info": ("organization = Spindle\ncn = localhost\ndns_name = localhost\n"
                        "ip_address = 127.0.0.1\ntls_www_server\nencryption_key\nsigning_key\n"
                        "expiration_days = 30\n"),
        "client.info": ("organization = Spindle\ncn = client\ntls_www_client\nencryption_key\n"
                        "signing_key\nexpiration_days = 30\n"),
    }
    for name, text in templates.items():
        with open(p(name), "w") as f:
            f.write(text)
    certtool("--generate-privkey", "--outfile", p("ca-key.pem"))
    certtool("--generate-self-signed", "--load-privkey", p("ca-key.pem"), "--template",
             p("ca.info"), "--outfile", p("ca-cert.pem"))
    for who in ("server", "client"):
        certtool("--generate-privkey", "--outfile", p(f"{who}-key.pem"))
        certtool("--generate-certificate", "--load-ca-certificate", p("ca-cert.pem"),
                 "--load-ca-privkey", p("ca-key.pem"), "--load-privkey", p(f"{who}-key.pem"),
                 "--template", p(f"{who}.info"), "--outfile", p(f"{who}-cert.pem"))
    return directory


def make_psk(directory, user="alice"):
    os.makedirs(directory, exist_ok=True)
    si.run(["psktool", "-u", user, "-p", os.path.join(directory, "keys.psk")], timeout=30)
    return os.path.join(directory, "keys.psk")


class TlsTest(si.InteropTest):

    def setUp(self):
        super().setUp()
        self.image = self.make_image("disk.img", 16 * MiB, [(MiB, pattern(7, 64 * 1024))])

    # ---- URIs and client command lines ----
    def x509_uri(self, server, certs):
        if server.tcp:
            return f"nbds://127.0.0.1:{server.port}/?tls-certificates={certs}"
        return f"nbds+unix:///?socket={server.socket_path}&tls-certificates={certs}"

    def psk_uri(self, server, key_file, user="alice"):
        return f"nbds+unix://{user}@/?socket={server.socket_path}&tls-psk-file={key_file}"

    def qemu_x509(self, server, certs):
        """qemu-img/qemu-io arguments for an X.509 client (Unix sockets need tls-hostname)."""
        if server.tcp:
            where = f"server.type=inet,server.host=127.0.0.1,server.port={server.port}"
        else:
            where = f"server.type=unix,server.path={server.socket_path},tls-hostname=localhost"
        return ["--object", f"tls-creds-x509,id=tls0,dir={certs},endpoint=client",
                "--image-opts", f"driver=nbd,{where},tls-creds=tls0"]

    def qemu_psk(self, server, key_dir, user="alice"):
        return ["--object", f"tls-creds-psk,id=tls0,dir={key_dir},username={user},endpoint=client",
                "--image-opts",
                f"driver=nbd,server.type=unix,server.path={server.socket_path},tls-creds=tls0"]

    def assert_refused(self, cmd):
        proc = si.run(cmd, timeout=30, check=False)
        self.assertNotEqual(proc.returncode, 0, f"{' '.join(cmd)} succeeded; expected refusal")
        return proc

    def connect_tls(self, uri):
        """A libnbd handle; TLS URIs name local files (certificates, keys), which libnbd only
        reads when allowed to."""
        import nbd
        h = nbd.NBD()
        self.handles.append(h)
        h.set_uri_allow_local_file(True)
        h.connect_uri(uri)
        return h

    def assert_libnbd_round_trip(self, uri):
        h = self.connect_tls(uri)
        self.assertTrue(h.get_tls_negotiated())
        data = pattern(11, 256 * 1024)
        h.pwrite(data, 4 * MiB)
        h.flush()
        self.assertEqual(h.pread(len(data), 4 * MiB), data)
        self.assertEqual(h.pread(64 * 1024, MiB), pattern(7, 64 * 1024))
        h.shutdown()

    # ---- X.509 ----
    def test_x509_libnbd_and_qemu_clients(self):
        certs = make_x509(self.path("pki"))
        server = self.server(self.image, ["--tls-creds", certs])
        uri = self.x509_uri(server, certs)
        si.run(["nbdinfo", "--is", "tls", uri], timeout=30)
        self.assertIn("with TLS", si.run(["nbdinfo", uri], timeout=30).stdout.decode())
        self.assert_libnbd_round_trip(uri)
        qemu = self.qemu_x509(server, certs)
        out = si.run(["qemu-io", *qemu, "-c", "write -P 0x5a 0 1M", "-c", "read -P 0x5a 0 1M",
                      "-c", f"read -P 0 {8 * MiB} 1M"], timeout=60).stdout.decode()
        self.assertNotIn("Pattern verification failed", out)
        info = si.run(["qemu-img", "info", "--output=json", *qemu], timeout=60).stdout.decode()
        self.assertIn(str(16 * MiB), info)
        # The data went to the image.
        with open(self.image, "rb") as f:
            self.assertEqual(f.read(MiB), b"\x5a" * MiB)

    def test_x509_over_tcp(self):
        certs = make_x509(self.path("pki"))
        server = self.server(self.image, ["--tls-creds", certs], tcp=True)
        self.assertIn("nbds://", server.log_text())
        self.assert_libnbd_round_trip(self.x509_uri(server, certs))
        qemu = self.qemu_x509(server, certs)  # [--object, O, --image-opts, NBD]
        si.run(["qemu-img", "compare", *qemu[:3], f"driver=raw,file.filename={self.image}",
                qemu[3]], timeout=60)

    def test_x509_wrong_ca_refused_and_server_keeps_serving(self):
        certs = make_x509(self.path("pki"))
        other = make_x509(self.path("other"), " (impostor)")
        # libnbd 1.14 checks the server's certificate only over TCP (where it has a host name).
        tcp = self.server(self.image, ["--tls-creds", certs], tcp=True)
        self.assert_refused(["nbdinfo", "--size", self.x509_uri(tcp, other)])
        self.assert_libnbd_round_trip(self.x509_uri(tcp, certs))
        server = self.server(self.image, ["--tls-creds", certs])
        self.assert_refused(["qemu-img", "info", *self.qemu_x509(server, other)])
        # No TLS at all is refused too (forced TLS by default with credentials).
        self.assert_refused(["nbdinfo", "--size", server.uri()])
        self.assert_libnbd_round_trip(self.x509_uri(server, certs))

    def test_x509_verify_peer_needs_a_client_certificate(self):
        certs = make_x509(self.path("pki"))
        server = self.server(self.image, ["--tls-creds", certs, "--tls-verify-peer"])
        no_client_cert = self.path("ca-only")
        os.makedirs(no_client_cert)
        with open(os.path.join(certs, "ca-cert.pem"), "rb") as src, \
                open(os.path.join(no_client_cert, "ca-cert.pem"), "wb") as dst:
            dst.write(src.read())
        self.assert_refused(["nbdinfo", "--size", self.x509_uri(server, no_client_cert)])
        # A client certificate from another CA is refused as well.
        other = make_x509(self.path("other"), " (impostor)")
        mixed = self.path("mixed")
        os.makedirs(mixed)
        for name, source in (("ca-cert.pem", certs), ("client-cert.pem", other),
                             ("client-key.pem", other)):
            with open(os.path.join(source, name), "rb") as src, \
                    open(os.path.join(mixed, name), "wb") as dst:
                dst.write(src.read())
        self.assert_refused(["nbdinfo", "--size", self.x509_uri(server, mixed)])
        self.assert_libnbd_round_trip(self.x509_uri(server, certs))

    # ---- PSK ----
    def test_psk_libnbd_and_qemu_clients(self):
        keys = make_psk(self.path("psk"))
        server = self.server(self.image, ["--tls-psk", keys])
        self.assert_libnbd_round_trip(self.psk_uri(server, keys))
        out = si.run(["qemu-io", *self.qemu_psk(server, self.path("psk")),
                      "-c", "write -P 0xa7 2M 512k", "-c", "read -P 0xa7 2M 512k"],
                     timeout=60).stdout.decode()
        self.assertNotIn("Pattern verification failed", out)
        si.run(["nbdcopy", self.psk_uri(server, keys), self.path("copy.img")], timeout=60)
        with open(self.image, "rb") as a, open(self.path("copy.img"), "rb") as b:
            self.assertEqual(a.read(), b.read())

    def test_psk_wrong_key_or_user_refused(self):
        keys = make_psk(self.path("psk"))
        wrong = make_psk(self.path("wrong"))  # same user, another key
        server = self.server(self.image, ["--tls-psk", keys])
        self.assert_refused(["nbdinfo", "--size", self.psk_uri(server, wrong)])
        self.assert_refused(["qemu-img", "info", *self.qemu_psk(server, self.path("wrong"))])
        mallory = make_psk(self.path("mallory"), "mallory")
        self.assert_refused(["nbdinfo", "--size", self.psk_uri(server, mallory, "mallory")])
        self.assert_libnbd_round_trip(self.psk_uri(server, keys))

    # ---- --tls=on: both ----
    def test_tls_on_serves_tls_and_clear_clients(self):
        certs = make_x509(self.path("pki"))
        server = self.server(self.image, ["--tls-creds", certs, "--tls=on"])
        self.assert_libnbd_round_trip(self.x509_uri(server, certs))
        h = self.connect_tls(server.uri())
        self.assertFalse(h.get_tls_negotiated())
        self.assertEqual(h.pread(64 * 1024, MiB), pattern(7, 64 * 1024))
        h.shutdown()

    def test_starttls_refused_without_credentials(self):
        server = self.server(self.image)
        s = self.raw_negotiating(server)
        send_option(s, OPT_STARTTLS)
        _, reply_type, _ = read_option_reply(s)
        self.assertEqual(reply_type, REP_ERR_UNSUP)
        certs = make_x509(self.path("pki"))
        self.assert_refused(["nbdinfo", "--size", self.x509_uri(server, certs)])
        self.assert_serving(server)

    # ---- the STARTTLS rules, byte by byte ----
    def raw_negotiating(self, server):
        s = server.connect_raw(timeout=10)
        self.addCleanup(s.close)
        read_greeting(s)
        s.sendall(struct.pack(">I", CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES))
        return s

    def start_tls(self, sock, certs):
        send_option(sock, OPT_STARTTLS)
        _, reply_type, _ = read_option_reply(sock)
        self.assertEqual(reply_type, REP_ACK)
        context = ssl.create_default_context(cafile=os.path.join(certs, "ca-cert.pem"))
        tls = context.wrap_socket(sock, server_hostname="localhost")
        tls.settimeout(10)
        return tls

    def test_forced_tls_answers_nothing_in_clear(self):
        certs = make_x509(self.path("pki"))
        server = self.server(self.image, ["--tls-creds", certs])
        s = self.raw_negotiating(server)
        for option, data in ((OPT_LIST, b""), (OPT_GO, info_payload("")),
                             (OPT_STRUCTURED_REPLY, b"")):
            send_option(s, option, data)
            _, reply_type, payload = read_option_reply(s)
            self.assertEqual(reply_type, REP_ERR_TLS_REQD, f"option {option}")
            self.assertNotIn(struct.pack(">Q", 16 * MiB), payload)  # no export size leaked
        send_option(s, OPT_STARTTLS, b"x")  # STARTTLS takes no data
        _, reply_type, _ = read_option_reply(s)
        self.assertEqual(reply_type, REP_ERR_INVALID)
        # EXPORT_NAME cannot carry an error: the server hangs up.
        send_option(s, OPT_EXPORT_NAME, b"")
        self.assertIsNotNone(wait_closed(s, 5), "EXPORT_NAME in clear text was not refused")

    def test_starttls_forgets_earlier_negotiation(self):
        certs = make_x509(self.path("pki"))
        server = self.server(self.image, ["--tls-creds", certs, "--tls=on"])
        s = self.raw_negotiating(server)
        send_option(s, OPT_STRUCTURED_REPLY)  # allowed in clear with --tls=on
        _, reply_type, _ = read_option_reply(s)
        self.assertEqual(reply_type, REP_ACK)
        tls = self.start_tls(s, certs)
        send_option(tls, OPT_STARTTLS)  # a second STARTTLS is invalid
        _, reply_type, _ = read_option_reply(tls)
        self.assertEqual(reply_type, REP_ERR_INVALID)
        send_option(tls, OPT_GO, info_payload(""))
        while True:
            _, reply_type, _ = read_option_reply(tls)
            if reply_type == REP_ACK:
                break
            self.assertEqual(reply_type, 3, f"GO answered {reply_type:#x}")  # REP_INFO
        # Structured replies were negotiated before STARTTLS, so they are forgotten: a READ
        # gets a simple reply.
        tls.sendall(request(CMD_READ, 42, MiB, 4096))
        error, cookie, data = read_simple_reply(tls, 4096)
        self.assertEqual((error, cookie), (0, 42))
        self.assertEqual(data, pattern(7, 4096))
        tls.sendall(request(CMD_DISC, 43, 0, 0))

    def test_garbage_instead_of_client_hello(self):
        certs = make_x509(self.path("pki"))
        server = self.server(self.image, ["--tls-creds", certs])
        s = self.raw_negotiating(server)
        send_option(s, OPT_STARTTLS)
        _, reply_type, _ = read_option_reply(s)
        self.assertEqual(reply_type, REP_ACK)
        # Not random bytes: those sometimes start with a valid record header whose length asks
        # for more than was sent, and then only the 10 s handshake timeout ends it.
        try:
            s.sendall(b"this is no TLS ClientHello\r\n" * 150)
        except OSError:
            pass
        self.assertIsNotNone(wait_closed(s, 5), "server kept a connection with a bad handshake")
        self.assert_libnbd_round_trip(self.x509_uri(server, certs))

    # ---- command line ----
    def test_bad_tls_command_lines(self):
        certs = make_x509(self.path("pki"))
        keys = make_psk(self.path("psk"))
        cases = {
            ("--tls=require",): "needs --tls-creds",
            ("--tls=on",): "needs --tls-creds",
            ("--tls-creds", self.path("missing")): "cannot read",
            ("--tls-creds", certs, "--tls-psk", keys): "not both",
            ("--tls-psk", self.path("nope.psk")): "cannot read",
            ("--tls-verify-peer",): "needs --tls-creds",
            ("--tls=maybe", "--tls-creds", certs): "tls",
        }
        for args, message in cases.items():
            proc = subprocess.run([si.SPINDLE_NBD, "-k", self.path("x.sock"), *args, self.image],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30,
                                  stdin=subprocess.DEVNULL)
            self.assertNotEqual(proc.returncode, 0, f"{args} accepted")
            self.assertIn(message, proc.stderr.decode(), f"{args}: {proc.stderr!r}")


if __name__ == "__main__":
    si.main(required_binaries=["nbdinfo", "nbdcopy", "qemu-img", "qemu-io", "certtool",
                               "psktool"], needs_nbd_module=True)
