"""The rule that keeps secrets out of recorded commands (docs/claude-code.md)."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from claudectl.hooks.redact import MAX_COMMAND_CHARS, entropy, redact

CASES = [
    # URLs with credentials
    ("git clone https://alice:s3cr3t@github.com/a/b", "git clone https://***@github.com/a/b"),
    ("pip install https://tok@host/p", "pip install https://***@host/p"),
    # secret-named options, both forms
    ("deploy --token abc --env prod", "deploy --token *** --env prod"),
    ("deploy --client-secret=abc", "deploy --client-secret=***"),
    ("psql --password 'two words' db", "psql --password '***' db"),
    ("x --api-key K1 --auth-token T2", "x --api-key *** --auth-token ***"),
    ("docker login --password-stdin", "docker login --password-stdin"),
    ("git commit --author 'A B' -m msg", "git commit --author 'A B' -m msg"),
    # -p only where it is a password
    ("mysql -u root -phunter2 db", "mysql -u root -p*** db"),
    ("mysqldump -p hunter2 db", "mysqldump -p *** db"),
    ("sshpass -p pw ssh host", "sshpass -p *** ssh host"),
    ("mkdir -p build && ssh -p 2222 host", "mkdir -p build && ssh -p 2222 host"),
    ("curl -u bob:pw https://x", "curl -u bob:*** https://x"),
    # env assignments
    ("GITHUB_TOKEN=abc gh pr list", "GITHUB_TOKEN=*** gh pr list"),
    ("export AWS_SECRET_ACCESS_KEY='a b'; ls", "export AWS_SECRET_ACCESS_KEY=***; ls"),
    ("DB_PASSWORD=x PORT=5432 run", "DB_PASSWORD=*** PORT=5432 run"),
    # headers
    ('curl -H "Authorization: Bearer abc.def" u', 'curl -H "Authorization: Bearer ***" u'),
    ("curl -H 'X-Api-Key: zzz' u", "curl -H 'X-Api-Key: ***' u"),
    # token shapes and long random strings
    ("echo ghp_abcdefghijklmnop1234", "echo ***"),
    ("aws s3 ls AKIAABCDEFGHIJKLMNOP", "aws s3 ls ***"),
    ("use Zx9q7Lm2Pw4Rt8Yk3Vb6Nc1Hd5", "use ***"),
    # ordinary commands untouched
    ("cargo test --all", "cargo test --all"),
    (
        "ls /home/user/projects/some-long-directory-name/f.py",
        "ls /home/user/projects/some-long-directory-name/f.py",
    ),
    ("npm run build-production-artifacts-now", "npm run build-production-artifacts-now"),
]


class RedactTests(SynchronousTestCase):
    def test_cases(self) -> None:
        for raw, want in CASES:
            self.assertEqual(redact(raw), want, raw)

    def test_idempotent(self) -> None:
        for raw, want in CASES:
            self.assertEqual(redact(want), want, raw)

    def test_capped(self) -> None:
        out = redact("echo " + "ab " * 5000)
        self.assertEqual(len(out), MAX_COMMAND_CHARS)
        self.assertTrue(out.endswith("\u2026"))

    def test_entropy(self) -> None:
        self.assertEqual(entropy(""), 0.0)
        self.assertEqual(entropy("aaaa"), 0.0)
        self.assertAlmostEqual(entropy("abcd"), 2.0)

    def test_unbalanced_quotes_do_not_break_it(self) -> None:
        self.assertEqual(redact("x --token 'abc"), "x --token ***")
