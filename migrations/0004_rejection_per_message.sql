-- A message costs at most one rejection row, however many of its values were refused: its
-- raw bytes are stored once, and `value_count` says how many values the row stands for.
-- An input too large to keep whole keeps a prefix in `raw`; `size` is the input's size (a
-- serial line over max_line is skipped uncounted: there, the bytes kept).
-- Rows from before keep NULL there: their raw bytes are the whole input.
ALTER TABLE rejections ADD COLUMN size INTEGER;
ALTER TABLE rejections ADD COLUMN value_count INTEGER NOT NULL DEFAULT 1;

-- One reason for an input over its size limit, a serial line or a payload.
UPDATE rejections SET reason = 'too_large' WHERE reason = 'too_long';

