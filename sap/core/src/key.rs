//! Authorization keys: one per overlay entity, derived by the control plane from a cluster secret,
//! the entity's identity and a rotation epoch, and accepted across a rotation for a grace window so
//! that rotating loses no packets. Time is always passed in (milliseconds since the Unix epoch), so
//! tests control the clock.

use std::fmt;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// A 32-bit authorization key, carried in the GUE group-identifier field.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Key(pub u32);

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({:#010x})", self.0)
    }
}

/// The key of packet authentication's MAC (SipHash-2-4) for one entity and epoch: known to the
/// control plane and SaPs, never to workloads, so a 32-bit [`Key`] seen on the wire does not let
/// anyone seal a datagram. Its bytes never appear in logs.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct MacKey([u8; 16]);

impl MacKey {
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        MacKey(bytes)
    }

    pub fn bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Debug for MacKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MacKey(redacted)")
    }
}

/// A rotation epoch: `floor(now / period)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Epoch(pub u64);

/// The cluster secret keys are derived from. Its bytes never appear in logs.
#[derive(Clone)]
pub struct ClusterSecret(Box<[u8]>);

/// The shortest secret accepted: below this an attacker could search the secret itself.
pub const MIN_SECRET_LEN: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("cluster secret is {got} bytes; at least {MIN_SECRET_LEN} are required")]
    SecretTooShort { got: usize },
    #[error("rotation period must be at least 1 s, got {period_ms} ms")]
    PeriodTooShort { period_ms: u64 },
    #[error(
        "grace window ({grace_ms} ms) must be shorter than half the rotation period ({period_ms} ms)"
    )]
    GraceTooLong { grace_ms: u64, period_ms: u64 },
    #[error("an attestation is {ATTESTATION_LEN} bytes in hex")]
    BadAttestation,
}

impl fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClusterSecret({} bytes, redacted)", self.0.len())
    }
}

impl ClusterSecret {
    pub fn new(bytes: impl Into<Box<[u8]>>) -> Result<Self, KeyError> {
        let bytes = bytes.into();
        if bytes.len() < MIN_SECRET_LEN {
            return Err(KeyError::SecretTooShort { got: bytes.len() });
        }
        Ok(ClusterSecret(bytes))
    }

    /// `Key = first 32 bits of HMAC-SHA256(secret, "keyway/key/v1" 0 entity 0 epoch_be64)`.
    pub fn derive(&self, entity: &str, epoch: Epoch) -> Key {
        let tag = self
            .labelled("keyway/key/v1", entity, &epoch.0.to_be_bytes())
            .finalize()
            .into_bytes();
        Key(u32::from_be_bytes([tag[0], tag[1], tag[2], tag[3]]))
    }

    /// `MacKey = first 128 bits of HMAC-SHA256(secret, "keyway/mac/v1" 0 entity 0 epoch_be64)`:
    /// separate from the authorization key by its prefix, so one never tells anything of the other.
    pub fn derive_mac(&self, entity: &str, epoch: Epoch) -> MacKey {
        let tag = self
            .labelled("keyway/mac/v1", entity, &epoch.0.to_be_bytes())
            .finalize()
            .into_bytes();
        let mut k = [0u8; 16];
        k.copy_from_slice(&tag[..16]);
        MacKey(k)
    }

    fn attestation_mac(&self, context: &str, message: &[u8]) -> Hmac<Sha256> {
        self.labelled("keyway/attest/v1", context, message)
    }

    /// `HMAC-SHA256(secret, label 0 name 0 message)`, not yet finalised: every derivation from
    /// the secret, told apart by its label.
    fn labelled(&self, label: &str, name: &str, message: &[u8]) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0)
            .expect("HMAC accepts keys of any length");
        mac.update(label.as_bytes());
        mac.update(b"\0");
        mac.update(name.as_bytes());
        mac.update(b"\0");
        mac.update(message);
        mac
    }

    /// `Attestation = first 128 bits of HMAC-SHA256(secret, "keyway/attest/v1" 0 context 0
    /// message)`: what only a holder of the secret (an agent) can say about `message`, such as
    /// where a pod is on the overlay. Separate from key derivation by its prefix.
    pub fn attest(&self, context: &str, message: &[u8]) -> Attestation {
        let tag = self
            .attestation_mac(context, message)
            .finalize()
            .into_bytes();
        let mut a = [0u8; ATTESTATION_LEN];
        a.copy_from_slice(&tag[..ATTESTATION_LEN]);
        Attestation(a)
    }

    /// Whether `attestation` is this secret's over `message` in `context` (compared in constant
    /// time).
    pub fn attests(&self, context: &str, message: &[u8], attestation: &Attestation) -> bool {
        self.attestation_mac(context, message)
            .verify_truncated_left(&attestation.0)
            .is_ok()
    }
}

const ATTESTATION_LEN: usize = 16;

/// A 128-bit attestation (see [`ClusterSecret::attest`]), written as 32 lowercase hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attestation([u8; ATTESTATION_LEN]);

impl fmt::Display for Attestation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl std::str::FromStr for Attestation {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, KeyError> {
        let bad = || KeyError::BadAttestation;
        if s.len() != 2 * ATTESTATION_LEN || !s.is_ascii() {
            return Err(bad());
        }
        let mut a = [0u8; ATTESTATION_LEN];
        for (i, b) in a.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(Attestation(a))
    }
}

/// The rotation schedule: epochs of `period_ms`, with the neighbouring epochs' keys accepted for
/// `grace_ms` either side of each boundary (the previous one after it, for packets in flight and
/// senders that have not yet re-keyed; the next one before it, for senders whose clock runs ahead).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rotation {
    period_ms: u64,
    grace_ms: u64,
}

impl Rotation {
    pub fn new(period_ms: u64, grace_ms: u64) -> Result<Self, KeyError> {
        if period_ms < 1000 {
            return Err(KeyError::PeriodTooShort { period_ms });
        }
        if grace_ms.saturating_mul(2) >= period_ms {
            return Err(KeyError::GraceTooLong {
                grace_ms,
                period_ms,
            });
        }
        Ok(Rotation {
            period_ms,
            grace_ms,
        })
    }

    pub fn period_ms(&self) -> u64 {
        self.period_ms
    }

    pub fn grace_ms(&self) -> u64 {
        self.grace_ms
    }

    pub fn epoch_at(&self, now_ms: u64) -> Epoch {
        Epoch(now_ms / self.period_ms)
    }

    pub fn start_of(&self, epoch: Epoch) -> u64 {
        epoch.0.saturating_mul(self.period_ms)
    }
}

impl Default for Rotation {
    /// One hour epochs with a one-minute grace window.
    fn default() -> Self {
        Rotation {
            period_ms: 3_600_000,
            grace_ms: 60_000,
        }
    }
}

/// The keys of one entity around a centre epoch: enough to send and to check for one full period
/// after it was derived, so the control plane must re-derive at least once per period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyRing {
    Rotating {
        rotation: Rotation,
        centre: Epoch,
        /// Keys of epochs `centre - 1`, `centre`, `centre + 1`.
        keys: [Key; 3],
        /// The MAC keys of the same epochs.
        macs: [MacKey; 3],
    },
    /// A key that never rotates: provisioned by configuration for an endpoint outside the cluster.
    /// It has no MAC key: packet authentication needs keys derived from the cluster secret.
    Static(Key),
}

impl KeyRing {
    pub fn derive(secret: &ClusterSecret, entity: &str, rotation: Rotation, now_ms: u64) -> Self {
        let centre = rotation.epoch_at(now_ms);
        let epochs = [centre.0.saturating_sub(1), centre.0, centre.0 + 1].map(Epoch);
        KeyRing::Rotating {
            rotation,
            centre,
            keys: epochs.map(|e| secret.derive(entity, e)),
            macs: epochs.map(|e| secret.derive_mac(entity, e)),
        }
    }

    /// The MAC key that goes with `key` (one this ring holds): what seals a datagram sent with
    /// `key`, and checks one that arrives with it. `None` for a static key.
    pub fn mac_for(&self, key: Key) -> Option<&MacKey> {
        match self {
            KeyRing::Static(_) => None,
            KeyRing::Rotating { keys, macs, .. } => {
                keys.iter().position(|k| *k == key).map(|i| &macs[i])
            }
        }
    }

    fn key_of(&self, epoch: Epoch) -> Option<Key> {
        match self {
            KeyRing::Static(k) => Some(*k),
            KeyRing::Rotating { centre, keys, .. } => {
                let idx = epoch.0.checked_add(1)?.checked_sub(centre.0)?;
                keys.get(usize::try_from(idx).ok()?).copied()
            }
        }
    }

    /// The key a sender uses at `now_ms`. `None` when the ring is too old to know it: the control
    /// plane fell behind, and sending with a guessed key would only be dropped.
    pub fn key_at(&self, now_ms: u64) -> Option<Key> {
        match self {
            KeyRing::Static(k) => Some(*k),
            KeyRing::Rotating { rotation, .. } => self.key_of(rotation.epoch_at(now_ms)),
        }
    }

    /// Whether a receiver accepts `key` at `now_ms`: the current epoch's key always, the previous
    /// one within the grace window after the boundary, the next one within it before the boundary.
    /// Every key [`accepts`](Self::accepts) takes at `now_ms` (one to three): what the kernel
    /// fast path is given, to check a key by comparison alone.
    pub fn accepted_at(&self, now_ms: u64) -> Vec<Key> {
        match self {
            KeyRing::Static(k) => vec![*k],
            KeyRing::Rotating { rotation, .. } => {
                let now = rotation.epoch_at(now_ms);
                let mut keys: Vec<Key> = [now.0.checked_sub(1), Some(now.0), Some(now.0 + 1)]
                    .into_iter()
                    .flatten()
                    .filter_map(|e| self.key_of(Epoch(e)))
                    .filter(|k| self.accepts(*k, now_ms))
                    .collect();
                keys.dedup();
                keys
            }
        }
    }

    pub fn accepts(&self, key: Key, now_ms: u64) -> bool {
        match self {
            KeyRing::Static(k) => *k == key,
            KeyRing::Rotating { rotation, .. } => {
                let now = rotation.epoch_at(now_ms);
                if self.key_of(now) == Some(key) {
                    return true;
                }
                let since_start = now_ms - rotation.start_of(now);
                let until_next = rotation.period_ms - since_start;
                (since_start < rotation.grace_ms
                    && now.0 > 0
                    && self.key_of(Epoch(now.0 - 1)) == Some(key))
                    || (until_next <= rotation.grace_ms
                        && self.key_of(Epoch(now.0 + 1)) == Some(key))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The derivations as their documentation states them, computed here without the code
    /// under test: a change would break every cluster whose agents run mixed versions.
    #[test]
    fn derivations_are_the_documented_hmacs() {
        let secret = ClusterSecret::new(vec![7u8; 32]).unwrap();
        let hmac = |label: &str, entity: &str, epoch: u64| {
            let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(&[7u8; 32]).unwrap();
            let mut input = format!("{label}\0{entity}\0").into_bytes();
            input.extend_from_slice(&epoch.to_be_bytes());
            m.update(&input);
            m.finalize().into_bytes()
        };
        let tag = hmac("keyway/key/v1", "ns/pod", 5);
        assert_eq!(
            secret.derive("ns/pod", Epoch(5)),
            Key(u32::from_be_bytes([tag[0], tag[1], tag[2], tag[3]]))
        );
        let tag = hmac("keyway/mac/v1", "ns/pod", 5);
        assert_eq!(secret.derive_mac("ns/pod", Epoch(5)).0[..], tag[..16]);
    }

    #[test]
    fn mac_keys_go_with_their_epochs_key_and_differ_from_it() {
        let s = secret();
        let r = Rotation::new(10_000, 1_000).unwrap();
        let ring = KeyRing::derive(&s, "x/a", r, 25_000);
        for e in [1, 2, 3] {
            let k = s.derive("x/a", Epoch(e));
            assert_eq!(ring.mac_for(k), Some(&s.derive_mac("x/a", Epoch(e))));
        }
        assert_ne!(s.derive_mac("x/a", Epoch(2)), s.derive_mac("x/b", Epoch(2)));
        assert_ne!(s.derive_mac("x/a", Epoch(2)), s.derive_mac("x/a", Epoch(3)));
        assert_eq!(ring.mac_for(s.derive("x/a", Epoch(5))), None, "not held");
        assert_eq!(KeyRing::Static(Key(1)).mac_for(Key(1)), None);
        assert_eq!(
            format!("{:?}", s.derive_mac("x/a", Epoch(2))),
            "MacKey(redacted)"
        );
    }

    #[test]
    fn an_attestation_holds_for_its_message_and_context_only() {
        let s = ClusterSecret::new(vec![1u8; 32]).unwrap();
        let other = ClusterSecret::new(vec![2u8; 32]).unwrap();
        let a = s.attest("attachment", b"x/a node-1");
        let text = a.to_string();
        assert_eq!(text.len(), 32);
        let back: Attestation = text.parse().unwrap();
        assert!(s.attests("attachment", b"x/a node-1", &back));
        assert!(!s.attests("attachment", b"x/a node-2", &back));
        assert!(!s.attests("other", b"x/a node-1", &back));
        assert!(!other.attests("attachment", b"x/a node-1", &back));
        assert!("zz".parse::<Attestation>().is_err());
        assert!("é".repeat(16).parse::<Attestation>().is_err());
    }

    fn secret() -> ClusterSecret {
        ClusterSecret::new(b"0123456789abcdef0123456789abcdef".to_vec()).unwrap()
    }

    #[test]
    fn derivation_is_deterministic_and_separates_entities_and_epochs() {
        let s = secret();
        assert_eq!(
            s.derive("default/a", Epoch(1)),
            s.derive("default/a", Epoch(1))
        );
        assert_ne!(
            s.derive("default/a", Epoch(1)),
            s.derive("default/b", Epoch(1))
        );
        assert_ne!(
            s.derive("default/a", Epoch(1)),
            s.derive("default/a", Epoch(2))
        );
        let other = ClusterSecret::new(b"fedcba9876543210fedcba9876543210".to_vec()).unwrap();
        assert_ne!(
            s.derive("default/a", Epoch(1)),
            other.derive("default/a", Epoch(1))
        );
    }

    #[test]
    fn derivation_is_pinned() {
        // Golden value, cross-checked with Python's hmac module. Changing the derivation would
        // split a cluster mid-upgrade.
        assert_eq!(secret().derive("ns/pod", Epoch(42)), Key(0xb605_5249));
    }

    #[test]
    fn short_secrets_and_bad_schedules_are_refused() {
        assert_eq!(
            ClusterSecret::new(vec![0u8; 8]).unwrap_err(),
            KeyError::SecretTooShort { got: 8 }
        );
        assert!(Rotation::new(500, 0).is_err());
        assert!(Rotation::new(10_000, 5_000).is_err());
        assert!(Rotation::new(10_000, 4_999).is_ok());
    }

    #[test]
    fn rotation_accepts_neighbours_only_within_grace() {
        let s = secret();
        let rot = Rotation::new(10_000, 1_000).unwrap();
        // Derived at t = 25 s: centre epoch 2.
        let ring = KeyRing::derive(&s, "ns/p", rot, 25_000);
        let k = |e| s.derive("ns/p", Epoch(e));
        assert_eq!(ring.key_at(25_000), Some(k(2)));
        assert!(ring.accepts(k(2), 25_000));
        assert!(!ring.accepts(k(1), 25_000), "previous epoch outside grace");
        assert!(!ring.accepts(k(3), 25_000), "next epoch outside grace");
        // Just after the 30 s boundary: epoch 3 is current, epoch 2 still accepted.
        assert_eq!(ring.key_at(30_100), Some(k(3)));
        assert!(ring.accepts(k(3), 30_100));
        assert!(ring.accepts(k(2), 30_100));
        assert!(!ring.accepts(k(2), 31_000), "grace over");
        // Just before the boundary, a sender already on epoch 3 is accepted.
        assert!(ring.accepts(k(3), 29_500));
        // A ring never refreshed runs out: fail closed rather than guess.
        assert_eq!(ring.key_at(45_000), None);
        assert!(!ring.accepts(k(4), 45_000));
        assert!(!ring.accepts(Key(0), 25_000));
    }

    #[test]
    fn the_accepted_set_is_exactly_what_accepts_takes() {
        let rotation = Rotation::new(10_000, 4_000).unwrap();
        let ring = KeyRing::derive(&secret(), "ns/pod", rotation, 50_000);
        let candidates: Vec<Key> = (3..=7)
            .map(|e| secret().derive("ns/pod", Epoch(e)))
            .chain([Key(0), Key(1)])
            .collect();
        // Every 250 ms across the ring's three epochs and the edges of its grace windows.
        for now in (40_000..70_000)
            .step_by(250)
            .chain([43_999, 44_000, 56_000, 55_999])
        {
            let set = ring.accepted_at(now);
            assert!((1..=3).contains(&set.len()), "{now}: {set:?}");
            for k in &candidates {
                assert_eq!(set.contains(k), ring.accepts(*k, now), "{now}: {k:?}");
            }
        }
        assert_eq!(KeyRing::Static(Key(9)).accepted_at(5), vec![Key(9)]);
    }

    #[test]
    fn static_keys_never_rotate() {
        let ring = KeyRing::Static(Key(9));
        assert!(ring.accepts(Key(9), 0));
        assert!(ring.accepts(Key(9), u64::MAX));
        assert!(!ring.accepts(Key(8), 0));
        assert_eq!(ring.key_at(123), Some(Key(9)));
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        assert_eq!(
            format!("{:?}", secret()),
            "ClusterSecret(32 bytes, redacted)"
        );
    }
}
