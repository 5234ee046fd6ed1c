-- Masks to review first: the 50 lowest quality scores, with group and CTR.
SELECT uid, group_name, model, ROUND(quality, 3) AS quality, ROUND(ctr, 3) AS ctr
FROM label_results
ORDER BY quality ASC, uid
LIMIT 50;
