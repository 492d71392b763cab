"""Disk unlock at boot: where dm-crypt, cryptsetup and systemd-cryptsetup ask for keys.

They only look keys up and never upcall, so keybroker meets them where they ask, and
obtains every key through the kernel keyring (request_key with a callout, so the
request-key handler attests on a miss and a second volume or a retry reuses the key):

* :mod:`.keyfile`: the crypttab key file as an AF_UNIX socket (systemd >= 248);
* :mod:`.askpass`: a systemd password agent answering ``cryptsetup:`` prompts;
* :mod:`.place`: a ``logon`` or ``user`` key placed in root's user keyring before
  ``systemd-cryptsetup@<volume>.service``, for dm-crypt keyring keys and LUKS2 keyring tokens.

All three retry with back-off while the network or the key server is not there yet
(:mod:`.retry`), report progress to the journal and ``sd_notify`` (:mod:`.progress`), and
give up cleanly so that the passphrase prompt still works.
"""
