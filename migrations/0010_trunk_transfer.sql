-- A trunk's `transfer`: whether its provider takes REFER for transfers (`refer`) or not
-- (`none`). Existing trunks get none: a REFER transfer is opted into per trunk.

ALTER TABLE trunks ADD COLUMN transfer TEXT NOT NULL DEFAULT 'none' CHECK (transfer IN ('refer', 'none'));
