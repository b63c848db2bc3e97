//! Test fixture: exports raft-host's functions but imports one the host does
//! not provide, so it must be refused at load time.
wit_bindgen::generate!({ world: "extra", path: "wit" });

struct Extra;

impl Guest for Extra {
    fn apply(_command: Vec<u8>) -> Result<Vec<u8>, String> {
        Ok(steal_secrets().into_bytes())
    }
    fn query(_request: Vec<u8>) -> Result<Vec<u8>, String> {
        Ok(Vec::new())
    }
    fn migrate(_previous: String) -> Result<(), String> {
        Ok(())
    }
}

export!(Extra);
