-- Transport and protocol faults per device: connections that failed or broke, requests
-- without an answer, garbled answers (bad CRC), Modbus exception responses.
ALTER TABLE devices ADD COLUMN reconnects INTEGER NOT NULL DEFAULT 0;
ALTER TABLE devices ADD COLUMN timeouts   INTEGER NOT NULL DEFAULT 0;
ALTER TABLE devices ADD COLUMN crc_errors INTEGER NOT NULL DEFAULT 0;
ALTER TABLE devices ADD COLUMN exceptions INTEGER NOT NULL DEFAULT 0;
