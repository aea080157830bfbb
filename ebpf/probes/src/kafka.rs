//! Kafka: recognise a client connection from its first request header. Its bytes are then
//! captured whole (`stream`) and framed by the agent.

/// Frames above this are not Kafka requests (brokers refuse far smaller ones by default); it also
/// keeps text protocols out: any ASCII first byte makes the size larger.
const MAX_REQUEST_SIZE: u32 = 64 << 20;
/// Api keys and versions go a little past what Kafka 4 defines, so newer clients still match.
const MAX_API_KEY: u16 = 100;
const MAX_API_VERSION: u16 = 30;
/// api key + version + correlation id + client id length.
const MIN_REQUEST_SIZE: u32 = 10;

/// Does a client's payload start with a Kafka request: int32 size, int16 api key, int16 version?
#[inline(always)]
pub fn is_request_start(prefix: &[u8; 8]) -> bool {
    let size = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
    let api_key = u16::from_be_bytes([prefix[4], prefix[5]]);
    let api_version = u16::from_be_bytes([prefix[6], prefix[7]]);
    (MIN_REQUEST_SIZE..MAX_REQUEST_SIZE).contains(&size) && api_key <= MAX_API_KEY && api_version <= MAX_API_VERSION
}
